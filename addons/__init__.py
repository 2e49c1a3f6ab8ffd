"""Waypost: mitmproxy addons that make mitmdump a production HTTP proxy."""
