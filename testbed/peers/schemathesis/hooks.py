"""Schemathesis hooks for tests/integration/api_schema.rs.

One check of our own: a request that fits the project's schema (positive mode) must never be
refused with a cause that means "this request does not fit the schema". Schemathesis's own
`positive_data_acceptance` wants a 2xx, which the bridge cannot give to every schema-valid
body (an uplink naming another device is 403, a datagram that is not CoAP is 400 NOT_COAP),
so this checks the cause instead.
"""

import schemathesis
from hypothesis.internal import lambda_sources

_describe_lambda = lambda_sources.lambda_description


def _lambda_description_that_survives(f):
    """Hypothesis's description of a lambda, or a plain one where CPython 3.11 cannot give it.

    Hypothesis parses a lambda's source to describe it (only ever for a strategy's repr). Deep in
    a draw, CPython 3.11 can fail that parse with "SystemError: AST constructor recursion depth
    mismatch", and the run then ends in a Runtime Error that says nothing about the API under
    test. The description is cosmetic, so that one error falls back to a plain one.
    """
    try:
        return _describe_lambda(f)
    except SystemError:
        return "lambda: <source not shown>"


lambda_sources.lambda_description = _lambda_description_that_survives

SCHEMA_CAUSES = {
    "BAD_PATH",
    "MALFORMED_JSON",
    "INVALID_NOTIFICATION",
    "BAD_BASE64",
    "INVALID_TRIGGER",
    "UNSUPPORTED_MEDIA_TYPE",
}


@schemathesis.check
def schema_valid_input_is_not_refused_as_invalid(ctx, response, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    if response.status_code not in (400, 415):
        return None
    try:
        cause = response.json().get("cause")
    except Exception:
        return None
    if cause in SCHEMA_CAUSES:
        raise AssertionError(
            f"a request valid against the schema was refused {response.status_code} {cause}: "
            f"{response.text}"
        )
    return None
