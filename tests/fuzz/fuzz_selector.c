/* libFuzzer target: the label selector parser and matcher (core/ah_selector.c). The input is a
 * selector text (up to the first NUL; after it, a label text to match against).
 *
 * Checked: parsing never crashes or leaks; a parsed selector formats to a canonical text that
 * parses again and formats to the same text (the canonical form is a fixed point, so one scope
 * has one identity), and both match the labels alike; a failure leaves a message. */
#include "ah_common.h"
#include "ah_selector.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1);
    if (text == NULL) {
        return 0;
    }
    memcpy(text, data, size);
    text[size] = '\0';
    size_t sel_len = strlen(text);
    const char *labels_text = sel_len < size ? text + sel_len + 1 : "";
    char err[AH_ERRLEN] = "";
    ah_selector_t *sel = ah_selector_parse(text, err, sizeof(err));
    if (sel == NULL) {
        if (err[0] == '\0') {
            abort();
        }
        free(text);
        return 0;
    }
    char canon[AH_SELECTOR_TEXT_MAX * 8];
    if (ah_selector_format(sel, canon, sizeof(canon)) == AH_OK) {
        ah_selector_t *again = ah_selector_parse(canon, err, sizeof(err));
        if (again == NULL) {
            abort();
        }
        char canon2[sizeof(canon)];
        if (ah_selector_format(again, canon2, sizeof(canon2)) != AH_OK ||
            strcmp(canon, canon2) != 0) {
            abort();
        }
        ah_labels_t *labels = ah_labels_parse(labels_text, err, sizeof(err));
        if (labels != NULL &&
            ah_selector_matches(sel, labels) != ah_selector_matches(again, labels)) {
            abort();
        }
        ah_labels_free(labels);
        ah_selector_free(again);
    }
    ah_selector_free(sel);
    free(text);
    return 0;
}
