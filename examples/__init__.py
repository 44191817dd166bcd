"""Examples of using eskit from outside the repository."""
