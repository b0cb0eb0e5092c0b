"""The delivery worker: outbound SMTP/LMTP sessions and local Maildir delivery."""
