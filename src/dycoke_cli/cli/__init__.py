"""The command line: commands (app.py), flags, output, the chat loop, live display, Ctrl-C and
out-of-memory advice. Nothing here is imported by the stages below it."""
