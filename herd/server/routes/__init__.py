"""HTTP routes, one file per resource; common.py holds what they share."""
