"""The machinery beneath this step's lesson: see README.md here."""
