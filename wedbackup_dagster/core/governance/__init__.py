"""Governance: retention (what the policy no longer keeps is pruned) and GDPR erasure (crypto-shredding)."""
