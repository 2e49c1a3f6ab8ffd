"""The admin API behind the management app (`addons/management.py`), one job per module:

models    the pydantic models of its requests and answers (validation and the OpenAPI schemas)
routes    GET /admin/config, GET /admin/version, POST /admin/explain, GET /admin/openapi.json
effective the effective configuration: values as applied, sources, secrets redacted
explain   a synthetic flow and every addon's `explain(flow)`, in pipeline order
openapi   the OpenAPI 3.1 document, from the models, own and extension routes
"""
