"""What clients and operators call: webhook, admin, LLM, status and dashboard routes, schemas, auth."""
