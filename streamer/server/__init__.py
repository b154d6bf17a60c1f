"""HTTP and WebRTC signalling: aiohttp routes over the live channels."""
