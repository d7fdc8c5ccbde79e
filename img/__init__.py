"""The imaging engine that runs on the client."""
