"""The HTTP layer: routes (`app`), the gate before them (`guard`), the wire format (`protocol`), requests to the
engine and responses back (`serving`), admin changes (`deploy`, `uploads`), errors and metrics."""
