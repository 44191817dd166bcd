"""integration_svc: outbound Standard Webhooks delivered once per event and endpoint."""
