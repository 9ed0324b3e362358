"""The command side: decode a batch of commands, apply it in one transaction, buffer the outbox."""
