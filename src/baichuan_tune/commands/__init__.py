"""One module per `baichuan-tune` sub-command; each reads top to bottom: config, setup, loop, save."""
