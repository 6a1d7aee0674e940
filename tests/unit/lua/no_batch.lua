return { init = function() end }
