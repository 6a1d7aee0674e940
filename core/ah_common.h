/* Shared definitions for the agenthost core: error codes, limits, the command and control
 * document types every module speaks, and clock helpers. Nothing here allocates. */
#ifndef AH_COMMON_H
#define AH_COMMON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Return codes: 0 on success, a negative AH_E* on failure. */
#define AH_OK 0
#define AH_EINVAL (-1)   /* bad argument or input */
#define AH_ENOMEM (-2)   /* allocation failed */
#define AH_EIO (-3)      /* store or system I/O failed */
#define AH_EUNAVAIL (-4) /* store unreachable or disabled */
#define AH_ELUA (-5)     /* Lua error (message in the error buffer) */
#define AH_ETIMEOUT (-6) /* an operation ran out of time */
#define AH_ENOOP (-7)    /* nothing to do (e.g. a transition to the current state) */

#define AH_ERRLEN 512       /* size of caller-provided error buffers */
#define AH_REASON_MAX 1024  /* max bytes of a command's reason */
#define AH_NAME_MAX 255     /* max bytes of updated_by / agent_id */
#define AH_TIMESTAMP_LEN 32 /* "2026-01-11T10:30:00.123456Z" + NUL */

/* Commands as stored in the control document: resume is stored as "running" (kept compatible with the original distributed-control API). */
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

/* The control document (and, with agent_id set, an audit entry). */
typedef struct ah_control_s {
    ah_command_t command;
    int64_t version;
    int64_t timestamp_us; /* microseconds since the Unix epoch, UTC */
    char reason[AH_REASON_MAX + 1];
    char updated_by[AH_NAME_MAX + 1];
    char
        agent_id[AH_NAME_MAX + 1]; /* audit entries only: the agent that wrote it ("" if unknown) */
} ah_control_t;

/* "pause" | "running" | "shutdown" | "none". Never NULL. */
const char *ah_command_name(ah_command_t cmd);
/* Parses a stored command name ("pause", "running", "shutdown"; "resume" is accepted as
 * "running"). Returns 0 and fills *out, or AH_EINVAL. */
int ah_command_parse(const char *name, ah_command_t *out);
/* "cluster" | "local" | "signal" | "startup". */
const char *ah_source_name(ah_source_t src);

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
/* Formats ts_us as ISO 8601 UTC with microseconds: "2026-01-11T10:30:00.123456Z". */
void ah_format_timestamp(int64_t ts_us, char out[AH_TIMESTAMP_LEN]);
/* Copies src into dst of size n, always NUL-terminated, truncating. src may be NULL (→ ""). */
void ah_strlcpy(char *dst, const char *src, size_t n);
/* True if the n bytes at s are valid UTF-8 without NUL bytes. */
bool ah_utf8_valid(const char *s, size_t n);

#endif
