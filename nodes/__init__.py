"""The pack's Python side: ``ui/`` holds the thin node classes, the other modules the logic they call."""
