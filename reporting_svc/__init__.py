"""reporting_svc: sign-up, login, activity and profile-completeness read models fed by events."""
