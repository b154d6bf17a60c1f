"""streamer: a real-time talking-head server (Wav2Lip lip-sync over WebRTC)."""

__version__ = "0.1.0"
