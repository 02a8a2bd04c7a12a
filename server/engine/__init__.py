"""The torch engine: one backbone, adapter slots, continuous batching; and the contract every engine keeps."""
