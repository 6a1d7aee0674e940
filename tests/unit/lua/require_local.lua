local helper = require "fixture_helper"
return { batch = function() return helper.answer end }
