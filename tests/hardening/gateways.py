"""The hardening gateways' API keys, CORS origin and limits."""

ENV_KEYS = ("env-key-0f3a9c", "env-key-7d21e8")
FILE_KEY = "file-key-5b86c4"
ORIGIN = "https://app.example"

# the main gateway's limits: each test sends just past one of them
LIMITS = {
    "max_request_bytes": 6_000_000,
    "max_file_bytes": 2_500_000,  # past Starlette's 1 MiB spool size, so uploads do go to disk
    "max_image_pixels": 1_000_000,
    "max_video_seconds": 5,
    "max_video_frame_pixels": 500_000,
    "max_audio_seconds": 5,
    "max_points": 20_000,
    "max_imu_samples": 5_000,
    "max_fmri_repeats": 4,
    "max_text_chars": 4_000,
    "max_tokens_limit": 64,
    "max_turns": 6,
    "max_attachments": 2,
}

# the slow-client gateway: the way-in timeouts scaled down from the defaults (10 s headers, 30 s
# idle, 10 kB/s after 10 s of grace) so that each test waits seconds, not minutes
SLOW_CLIENTS = {
    "header_timeout_s": 2,
    "body_idle_timeout_s": 2,
    "min_upload_bytes_per_s": 1000,
    "upload_grace_s": 4,
    "max_uploads": 150,
    "max_connections": 120,
    "max_uploads_per_client": 8,
}

# the crowded gateway: API keys with quotas of their own, few slots, a low connection cap
KEYS = {"alice": "key-alice-93c1d0", "bob": "key-bob-4e7a25", "carol": "key-carol-b802f6"}
KEYS_FILE = f"""# one key a line; options after the key
{KEYS["alice"]} name=alice max_concurrent=10
{KEYS["bob"]} name=bob
{KEYS["carol"]}   per_minute=3 name=carol
"""
CROWDED = {"max_concurrent": 2, "max_queued": 30, "max_connections": 300, "trusted_proxies": "127.0.0.2"}

# the projects gateway: two keys that share a name by accident, two that share a project on
# purpose (a key being rotated); two decoding workers, so that a request's attachments decode at once
PROJECT_KEYS = {"team-1": "key-team-1-5d0c7a", "team-2": "key-team-2-e14b96",
                "old": "key-old-0a7f31", "new": "key-new-c3952e"}
PROJECT_KEYS_FILE = f"""{PROJECT_KEYS["team-1"]} name=team max_concurrent=1
{PROJECT_KEYS["team-2"]} name=team
{PROJECT_KEYS["old"]} name=acme-old project=acme
{PROJECT_KEYS["new"]} project=acme name=acme-new
"""
PROJECTS_ENV = {"ONELLM_PREPROCESS_WORKERS": "2"}  # an environment setting only

# the bounded gateway: what it keeps is a few records' worth, so that a handful of requests reaches it
PREFIX_BYTES = 30 * 128 * 4  # a prefix of make-tiny's model: 30 rows of 128 float32
BOUNDS = {
    "max_uploads": 2,  # below max_uploads_per_client, so that one client reaches it
    "max_files_per_key": 3,
    "response_ttl_s": 5,
    "stored_responses_mb": 0.008,  # a few records of ~1-2 kB
    "references_mb": 0.002,  # about ten uuids of ~200 bytes
    "prefix_cache_mb": 3.5 * PREFIX_BYTES / (1 << 20),  # three prefixes
    "dtype": "float32",  # the prefixes' size above; `auto` may choose bfloat16, half as large
}
