/* The fleet side of `agenthost ctl` (docs/API.md): `ctl agents` prints GET /api/cluster/agents
 * as a table, and `ctl pause|resume|shutdown --wait S` judges the "wait" object of a command's
 * answer. Both read the JSON bodies this agenthost writes, with a small reader of their own (no
 * JSON library in the core). */
#ifndef AH_CTL_FLEET_H
#define AH_CTL_FLEET_H

#include <stdio.h>

/* Prints the answer of GET /api/cluster/leases as a table (NAME OWNER TOKEN EXPIRES IN) and a
 * count line. 0, or 1 (message on err) when the answer has no "leases" array. */
int ah_ctl_fleet_print_leases(const char *body, FILE *out, FILE *err);

/* Prints the fleet of an /api/cluster/agents body as a table plus a summary line on out.
 * Returns 0, or 1 (message on err) when the body is not such an answer. */
int ah_ctl_fleet_print_agents(const char *body, FILE *out, FILE *err);

/* Judges a cluster command's answer that carries a "wait" object: 0 when "complete" is true;
 * 1 when it is false (the pending agents listed on err), when the wait carries an "error" (the
 * agent could not read the fleet's records: the outcome is unknown) or when the body has no
 * "wait". */
int ah_ctl_fleet_wait_outcome(const char *body, FILE *err);

/* Prints the body of GET /api/cluster/scopes as a table on out. 0, or 1 (err says why) when
 * the body is not one. */
int ah_ctl_fleet_print_scopes(const char *body, FILE *out, FILE *err);

#endif
