"""Reading video files: open and time the container (container.py), decode and pick frames
(frames.py), and the public reader joining them (read.py). Imports no model, decoding or
compression code."""
