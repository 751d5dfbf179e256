"""The bottom room: what every other room shares and nothing BERT-specific (errors a user can fix, file I/O)."""
