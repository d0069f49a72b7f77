"""Zero-trust messages: signing keys, the trust store, signing at publish and
verification before a task is looked up (see `policies.signing`)."""
