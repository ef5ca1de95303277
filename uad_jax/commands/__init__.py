"""What users run: thin absl entry points over importable functions (``run.py`` → ``train``).

May import every other layer; nothing imports commands.
"""
