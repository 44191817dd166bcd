"""notify_svc: e-mails sent once per event (welcome, security notices), from recorded intents."""
