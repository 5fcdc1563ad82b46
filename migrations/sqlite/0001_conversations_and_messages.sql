-- A conversation is one (platform, space, channel, thread); a thread is its own conversation.
CREATE TABLE conversations (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    platform       TEXT    NOT NULL,
    space          TEXT    NOT NULL DEFAULT '',
    channel        TEXT    NOT NULL,
    thread         TEXT    NOT NULL DEFAULT '',
    created_at     INTEGER NOT NULL,
    -- A DM (or the terminal): its one user owns it; group conversations put names on user lines.
    private        INTEGER NOT NULL DEFAULT 0,
    -- Context boundary written by `reset`: prompts only see messages with a larger id.
    reset_after    INTEGER NOT NULL DEFAULT 0,
    -- Chunked-trim boundary: kept so the prompt's beginning stays the same for several turns.
    trim_after     INTEGER NOT NULL DEFAULT 0,
    -- Per-conversation settings; NULL means "use the configured default".
    system_prompt  TEXT,
    temperature    REAL,
    max_new_tokens INTEGER,
    UNIQUE (platform, space, channel, thread)
);

CREATE TABLE messages (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id     INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role                TEXT    NOT NULL CHECK (role IN ('user', 'assistant')),
    author_id           TEXT,
    author_name         TEXT,
    content             TEXT    NOT NULL,
    -- Platform id of the message (Discord snowflake, Matrix event id): answered once, edited and
    -- deleted through it. Unique per platform.
    platform            TEXT    NOT NULL,
    platform_message_id TEXT,
    -- An assistant turn points at the user turn it answers.
    reply_to            INTEGER REFERENCES messages (id) ON DELETE CASCADE,
    status              TEXT    NOT NULL CHECK (status IN ('complete', 'cancelled', 'failed')),
    -- Token count of the turn as rendered in the prompt, and a fingerprint of what was counted,
    -- so a cached count is never used for different text or a different tokenizer.
    token_count         INTEGER,
    token_key           INTEGER,
    created_at          INTEGER NOT NULL,
    edited_at           INTEGER
);

CREATE UNIQUE INDEX messages_platform_message_id
    ON messages (platform, platform_message_id)
    WHERE platform_message_id IS NOT NULL;
CREATE INDEX messages_conversation ON messages (conversation_id, id);
CREATE INDEX messages_reply_to ON messages (reply_to);
