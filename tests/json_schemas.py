"""The seeded JSON-schema generator of the structured-output tests. It lives in the loadtest
package (`tandem.loadtest.json_schemas`) because the `structured` bench section compiles the
same schemas; tests import it from here or from there."""

from __future__ import annotations

from tandem.loadtest.json_schemas import Schema, generate_schemas

__all__ = ["Schema", "generate_schemas"]
