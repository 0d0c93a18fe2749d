"""Retrieving studies for C-MOVE, C-GET and the move command: locate, then move or get."""
