"""Keys: the master keyring and key wrapping, the encrypted key-store backup, master key rotation."""
