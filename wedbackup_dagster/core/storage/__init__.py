"""Where sealed archives live: the on-site vault, the provider replicas (S3, GCS, Azure) and provider health."""
