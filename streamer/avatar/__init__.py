"""Avatars: face detection, the prepared cache on disk, frame reading, and blending mouths back."""
