"""GitLab API access: client, pagination and the request budget."""
