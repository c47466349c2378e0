"""What people look at: the web dashboard, Grafana dashboards, alert rules."""
