/* Shared definitions for the agenthost core: error codes, limits, the command and control
 * document types every module speaks, and clock helpers. Nothing here allocates. */
#ifndef AH_COMMON_H
#define AH_COMMON_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Return codes: 0 on success, a negative AH_E* on failure. */
#define AH_OK 0
#define AH_EINVAL (-1)    /* bad argument or input */
#define AH_ENOMEM (-2)    /* allocation failed */
#define AH_EIO (-3)       /* store or system I/O failed */
#define AH_EUNAVAIL (-4)  /* store unreachable or disabled */
#define AH_ELUA (-5)      /* Lua error (message in the error buffer) */
#define AH_ETIMEOUT (-6)  /* an operation ran out of time */
#define AH_ENOOP (-7)     /* nothing to do (e.g. a transition to the current state) */
#define AH_EREFUSED (-8)  /* refused in this state (a local resume of an agent held paused) */
#define AH_ECONFLICT (-9) /* a conditional write found another version (nothing written) */

#define AH_ERRLEN 512       /* size of caller-provided error buffers */
#define AH_REASON_MAX 1024  /* max bytes of a command's reason */
#define AH_NAME_MAX 255     /* max bytes of updated_by / agent_id */
#define AH_TIMESTAMP_LEN 32 /* "2026-01-11T10:30:00.123456Z" + NUL */
/* Most audit entries one history request returns (the store, the HTTP API and the CLI). */
#define AH_HISTORY_MAX 1000
/* Longest timed pause (POST /api/cluster/pause?for=|until=), seconds: 30 days. */
#define AH_PAUSE_MAX_S 2592000
/* Most agent status records one fleet listing reads (the store and the HTTP API). */
#define AH_AGENTS_MAX 10000
/* Longest canonical selector text of a scope document (core/ah_selector.h). */
#define AH_SELECTOR_MAX 511
/* Most scope documents an agent keeps (more are ignored, with a warning). */
#define AH_SCOPES_MAX 64

/* A macro's value as a string literal: AH_XSTR(AH_HISTORY_MAX) is "1000". */
#define AH_STR(x) #x
#define AH_XSTR(x) AH_STR(x)

/* Commands as stored in the control document: resume is stored as "running" (kept compatible with
 * the original distributed-control API). */
typedef enum {
    AH_CMD_NONE = 0,
    AH_CMD_PAUSE,
    AH_CMD_RUNNING,
    AH_CMD_SHUTDOWN,
} ah_command_t;

/* Where a command came from; shown to Lua hooks as ev.source. */
typedef enum {
    AH_SOURCE_CLUSTER = 0,
    AH_SOURCE_LOCAL,
    AH_SOURCE_SIGNAL,
    AH_SOURCE_STARTUP,
} ah_source_t;

/* The control document (and, with agent_id set, an audit entry). A scope document (a command
 * for the agents its selector matches) has the same fields plus its canonical selector. */
typedef struct ah_control_s {
    ah_command_t command;
    int64_t version;
    int64_t timestamp_us; /* microseconds since the Unix epoch, UTC */
    char reason[AH_REASON_MAX + 1];
    char updated_by[AH_NAME_MAX + 1];
    char
        agent_id[AH_NAME_MAX + 1]; /* audit entries only: the agent that wrote it ("" if unknown) */
    int64_t expires_us;            /* a timed pause: when it ends (µs since the epoch); 0: none */
    int64_t drain_ms; /* pause/shutdown: the running call's waits are cancelled this many ms
                         after timestamp_us (drain=); 0: no deadline of its own */
    char selector[AH_SELECTOR_MAX + 1]; /* "": the cluster document global_control */
} ah_control_t;

/* "pause" | "running" | "shutdown" | "none". Never NULL. */
const char *ah_command_name(ah_command_t cmd);
/* Parses a stored command name ("pause", "running", "shutdown"; "resume" is accepted as
 * "running"). Returns 0 and fills *out, or AH_EINVAL. */
int ah_command_parse(const char *name, ah_command_t *out);
/* "cluster" | "local" | "signal" | "startup". */
const char *ah_source_name(ah_source_t src);

/* The one checked double -> integer conversion (a cast of a NaN or of a value outside the
 * target's range is undefined behaviour in C). Truncates v toward zero into *out and returns
 * 0 when the result fits in int64_t; otherwise returns AH_EINVAL and stores the nearest bound
 * (INT64_MIN or INT64_MAX; 0 for NaN), so a caller may either reject or saturate. */
int ah_double_to_int64(double v, int64_t *out);
/* a * b, saturated at INT64_MIN / INT64_MAX instead of overflowing (for unit scaling). */
int64_t ah_int64_mul_sat(int64_t a, int64_t b);
/* a + b and a - b, saturated the same way (times from another writer may be extreme). */
int64_t ah_int64_add_sat(int64_t a, int64_t b);
int64_t ah_int64_sub_sat(int64_t a, int64_t b);

/* Wall clock, microseconds since the Unix epoch. */
int64_t ah_now_us(void);
/* Monotonic clock, microseconds. */
int64_t ah_mono_us(void);
/* Monotonic clock with a few milliseconds' resolution but a fraction of the cost (for budgets). */
int64_t ah_mono_coarse_us(void);
struct timespec;
/* The CLOCK_MONOTONIC time `seconds` from now (negative/NaN → now; capped at a year), for
 * pthread_cond_timedwait() on condition variables created with CLOCK_MONOTONIC. */
void ah_mono_deadline(double seconds, struct timespec *out);
/* Waits on cond (lock held by the caller) until done(arg) is true or `seconds` have passed
 * (the deadline of ah_mono_deadline: cond must use CLOCK_MONOTONIC). done is called with the
 * lock held. Returns done(arg)'s last value: false means the time ran out. */
bool ah_cond_wait_until(pthread_cond_t *cond, pthread_mutex_t *lock, double seconds,
                        bool (*done)(void *arg), void *arg);
/* Takes lock, waits on cond until *flag is true or `seconds` have passed (as ah_cond_wait_until),
 * releases lock and returns *flag: the wait of a thread that stops when another sets a flag
 * under lock. */
bool ah_cond_wait_flag(pthread_cond_t *cond, pthread_mutex_t *lock, const bool *flag,
                       double seconds);
/* Sleeps the calling thread for `seconds` (>= 0), resuming after signals. */
void ah_sleep(double seconds);
/* The candidate (a NULL-terminated list) a misspelt word most likely meant, or NULL: names are
 * compared case-insensitively and without '_' and '-' ("onPause", "On_Pause" and "on_pause"
 * are the same name), then by edit distance (a swap of neighbours counts 1): at most 1 for
 * names of up to 4 characters, 2 for 5, 3 for longer ones ("cheque" → "check").
 * *exact is set when the normalized names are equal (only the spelling style differs). For
 * "did you mean" in every error that names an unknown word. */
const char *ah_suggest(const char *word, const char *const *candidates, bool *exact);
/* Parses a duration: a decimal number (digits with at most one '.', no sign or exponent) and
 * an optional unit ms, s, m or h ("90s", "15m", "1.5h", "250ms", "90" = seconds), into seconds.
 * Bounds are the caller's. 0 or AH_EINVAL. The one reader of durations: for= of a pause and
 * every duration setting (BATCH_TIMEOUT, ...). */
int ah_parse_duration(const char *text, double *out);
/* Capped exponential backoff: min * 2^failures, at most max (failures 0 → min). */
double ah_backoff(int failures, double min, double max);
/* A uniformly random factor in [lo, hi) from the rand_r() state *seed. */
double ah_jitter(unsigned int *seed, double lo, double hi);
/* The instants ah_format_timestamp can write: 0000-01-01T00:00:00Z to 9999-12-31T23:59:59.999999Z.
 */
#define AH_TIMESTAMP_MIN_US (-62167219200000000LL)
#define AH_TIMESTAMP_MAX_US (253402300799999999LL)
/* Formats ts_us as ISO 8601 UTC with microseconds: "2026-01-11T10:30:00.123456Z"; an instant
 * outside years 0-9999 (a foreign writer's date, say) is clamped to that range. */
void ah_format_timestamp(int64_t ts_us, char out[AH_TIMESTAMP_LEN]);
/* Copies src into dst of size n, always NUL-terminated, truncating. src may be NULL (→ ""). */
void ah_strlcpy(char *dst, const char *src, size_t n);
/* Length (1-4) of the valid UTF-8 sequence at s (n > 0 bytes left), or 0 if it is not one
 * (truncated, overlong, a surrogate or past U+10FFFF). A NUL byte is a sequence of length 1. */
size_t ah_utf8_seq_len(const unsigned char *s, size_t n);
/* True if the n bytes at s are valid UTF-8 without NUL bytes. */
bool ah_utf8_valid(const char *s, size_t n);

#endif
