return {
    batch = function() return 0 end,
    on_pause = "not a function",
}
