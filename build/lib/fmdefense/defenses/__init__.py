"""Every defense on one contract (base.Defense), the registry and the accept/purify/reject rule."""
