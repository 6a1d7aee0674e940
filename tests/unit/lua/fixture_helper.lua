-- A module next to require_local.lua, found through package.path.
return { answer = 42 }
