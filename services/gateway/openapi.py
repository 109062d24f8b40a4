"""The gateway's OpenAPI document (served at GET /openapi.json)."""

from __future__ import annotations

from typing import Any

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "field"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "field": {"type": ["string", "null"], "description": "offending field, e.g. history[3]"},
            },
        }
    },
}


def openapi_document(max_history: int, max_candidates: int) -> dict[str, Any]:
    ids = {"type": "array", "items": {"type": "integer", "minimum": 0}}
    error_response = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "onepool gateway",
            "version": "1",
            "description": "Ranks candidates for a user with HSTU on the worker that can do it cheapest "
            "(KV residency, embedding locality, load).",
        },
        "paths": {
            "/v1/recommend": {
                "post": {
                    "summary": "Rank candidate items for a user",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Recommend"}}
                        },
                    },
                    "responses": {
                        "200": {
                            "description": "ranked items; the trace id is in the x-trace-id header",
                            "headers": {"x-trace-id": {"schema": {"type": "string"}}},
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Recommendation"}
                                }
                            },
                        },
                        "400": {
                            "description": "invalid request, a string not in UTF-8 included (field named)",
                            **error_response,
                        },
                        "408": {
                            "description": "the body did not arrive in time (body_timeout)",
                            **error_response,
                        },
                        "413": {"description": "body too large", **error_response},
                        "415": {
                            "description": "not JSON in UTF-8: send Content-Type application/json",
                            **error_response,
                        },
                        "503": {
                            "description": "not served now, retry after Retry-After seconds: overloaded "
                            "(shed at the door), bus_unavailable, no_worker, upstream_failed",
                            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                            **error_response,
                        },
                        "504": {"description": "the request's deadline passed", **error_response},
                    },
                }
            },
            "/healthz": {"get": {"summary": "process alive", "responses": {"200": {"description": "alive"}}}},
            "/readyz": {
                "get": {
                    "summary": "connected to the bus, with a fresh routing view listing a routable worker",
                    "responses": {
                        "200": {"description": "ready"},
                        "503": {"description": "not ready; `reasons` says why"},
                    },
                }
            },
            "/metrics": {
                "get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text"}}}
            },
        },
        "components": {
            "schemas": {
                "Recommend": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["user_id", "history", "candidates"],
                    "properties": {
                        "user_id": {
                            "oneOf": [{"type": "string", "minLength": 1}, {"type": "integer", "minimum": 0}]
                        },
                        "history": {**ids, "maxItems": max_history, "description": "oldest first"},
                        "timestamps": {**ids, "description": "same length as history"},
                        "candidates": {**ids, "minItems": 1, "maxItems": max_candidates},
                        "k": {"type": "integer", "minimum": 1, "description": "default: all candidates"},
                    },
                },
                "Recommendation": {
                    "type": "object",
                    "required": [
                        "items",
                        "scores",
                        "worker",
                        "cached_tokens",
                        "computed_tokens",
                        "emb_hits",
                        "emb_misses",
                        "worker_queue_ms",
                        "worker_compute_ms",
                        "batch_size",
                        "latency_ms",
                    ],
                    "properties": {
                        "items": {"type": "array", "items": {"type": "integer"}},
                        "scores": {"type": "array", "items": {"type": "number"}},
                        "worker": {"type": "string"},
                        "cached_tokens": {"type": "integer"},
                        "computed_tokens": {"type": "integer"},
                        "emb_hits": {"type": "integer"},
                        "emb_misses": {"type": "integer"},
                        "worker_queue_ms": {
                            "type": "number",
                            "description": "time the request waited for the worker's model thread",
                        },
                        "worker_compute_ms": {
                            "type": "number",
                            "description": "the batch it was served in, start to end",
                        },
                        "batch_size": {"type": "integer", "description": "requests in that batch"},
                        "latency_ms": {"type": "number", "description": "the gateway's, receipt to answer"},
                    },
                },
                "Error": _ERROR,
            }
        },
    }
