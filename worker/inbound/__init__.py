"""Mail that comes back: sources (Graph, IMAP, an SMTP/LMTP receiver), bounces, suppression."""
