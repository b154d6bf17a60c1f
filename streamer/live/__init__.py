"""The live path: a channel's session clock and pipeline, the inference worker, the aiortc tracks."""
