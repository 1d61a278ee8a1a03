"""The main hardening gateway's API keys, CORS origin and limits."""

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
