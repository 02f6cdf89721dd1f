"""Forward-only numbered PostgreSQL migrations, shipped inside the e2a distribution."""
