"""Segment Anything (SAM), prompted by boxes."""
