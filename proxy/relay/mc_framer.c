/* The Memcached reply framer (mc_framer.h). State lives in the connection's rf_t:
 * hold/holdlen (a reply line cut by the end of a chunk, or an auto-discovery unit being
 * gathered), mc_need (bytes still missing from that unit; -1: holding a line), mc_block
 * (bytes of a data block passing through), opaque (a binary-protocol connection). */
#include "mc_framer.h"

#include <string.h>

#define MC_BIG ((int64_t)1 << 61)  /* a block this long never ends: lengths saturate here */

static const char AD_KEY[] = "AmazonElastiCache:cluster";

typedef struct {
    const char *p;
    size_t n;
} word_t;

/* The first (up to) four words of a line, split on single spaces as memcached does
 * (empty tokens ignored), after its trailing CR/LF run; returns how many (at most 4). */
static int words4(const char *s, size_t n, word_t w[4]) {
    while (n && (s[n - 1] == '\r' || s[n - 1] == '\n'))
        n--;
    int k = 0;
    size_t i = 0;
    while (i < n && k < 4) {
        while (i < n && s[i] == ' ')
            i++;
        if (i >= n)
            break;
        size_t start = i;
        while (i < n && s[i] != ' ')
            i++;
        w[k].p = s + start;
        w[k++].n = i - start;
    }
    return k;
}

static int word_is(const word_t *w, const char *lit) {
    size_t n = strlen(lit);
    return w->n == n && memcmp(w->p, lit, n) == 0;
}

/* The block length after a VALUE / VA / CONFIG line: -1 for other lines, -2 for a bad
 * length (memcache._reply_data_len raises); *ad: an auto-discovery header. */
static int64_t data_len(const char *line, size_t n, int *ad) {
    int idx;
    *ad = 0;
    if (line[0] == 'V') {
        if (n >= 6 && memcmp(line, "VALUE ", 6) == 0)
            idx = 3;
        else if (n >= 3 && memcmp(line, "VA ", 3) == 0)
            idx = 1;
        else
            return -1;
    } else if (line[0] == 'C' && n >= 7 && memcmp(line, "CONFIG ", 7) == 0) {
        idx = 3;
    } else {
        return -1;
    }
    word_t w[4];
    int k = words4(line, n, w);
    if (k <= idx || w[idx].n == 0 || w[idx].n > 10)  /* memcache._MAX_DIGITS */
        return -2;
    int64_t v = 0;
    for (size_t i = 0; i < w[idx].n; i++) {
        char c = w[idx].p[i];
        if (c < '0' || c > '9')
            return -2;
        v = v >= MC_BIG / 10 ? MC_BIG : v * 10 + (c - '0');
    }
    *ad = k >= 4 && ((word_is(&w[0], "CONFIG") && word_is(&w[1], "cluster")) ||
                     (word_is(&w[0], "VALUE") && word_is(&w[1], AD_KEY)));
    return v;
}

void mc_request(rf_t *f, const char *p, size_t n) {
    if (!f->mc_started && n) {
        f->mc_started = 1;
        if ((unsigned char)p[0] == 0x80)  /* a binary request: never rewritten */
            f->opaque = 1;
    }
}

int mc_idle(const rf_t *f) {
    /* Whether the first request was seen is not kept across parking: a text server
     * never starts a reply line with 0x81, the one thing it would change. */
    return !f->holdlen && !f->mc_block && !f->opaque;
}

/* A whole unit (header line, block, CRLF) at p[0:n]: ask Python, or close when the
 * block is not followed by CRLF (memcache._rewrite_unit raises). */
static int ask_unit(const char *p, size_t n, rf_out_t *o) {
    if (n < 2 || p[n - 2] != '\r' || p[n - 1] != '\n')
        return RF_ERROR;
    o->data = p;
    o->len = n;
    o->ask = RF_ASK_MC;
    return RF_ASK;
}

static size_t give(rf_t *f, size_t used, size_t n) {
    f->mc_cont = used < n;  /* called again with the rest of the same chunk */
    return used;
}

size_t mc_reply(rf_t *f, const char *p, size_t n, rf_out_t *o, int *action) {
    int cont = f->mc_cont;
    f->mc_cont = 0;
    if (f->opaque || n == 0) {
        o->fwd = n;
        return n;
    }
    if (!cont && !f->mc_started && !f->holdlen && (unsigned char)p[0] == 0x81) {
        f->opaque = 1;  /* a binary reply before any request (none held: it would be lost) */
        o->fwd = n;
        return n;
    }
    size_t pos = 0;
    if (f->holdlen) {
        if (f->mc_need < 0) {  /* a line cut by the end of a chunk */
            const char *nl = memchr(p, '\n', n);
            if (nl == NULL) {
                if (rf_hold(f, p, n) < 0 || f->holdlen > MC_MAX_LINE)
                    *action = RF_ERROR;
                return n;
            }
            pos = (size_t)(nl - p) + 1;
            if (rf_hold(f, p, pos) < 0) {
                *action = RF_ERROR;
                return n;
            }
            int ad;
            int64_t size = data_len(f->hold, f->holdlen, &ad);
            if (size == -2) {
                *action = RF_ERROR;
                return n;
            }
            if (!ad) {
                o->data = f->hold;
                o->len = f->holdlen;
                f->holdlen = 0;  /* the buffer lives till the next call */
                if (size >= 0)
                    f->mc_block = size + 2;
                *action = RF_EMIT;
                return give(f, pos, n);
            }
            if (size + 2 > RF_MAX_HOLD - (int64_t)f->holdlen) {
                *action = RF_ERROR;  /* Python would gather it without bound */
                return n;
            }
            f->mc_need = size + 2;
        }
        size_t take = (int64_t)(n - pos) < f->mc_need ? n - pos : (size_t)f->mc_need;
        if (rf_hold(f, p + pos, take) < 0) {
            *action = RF_ERROR;
            return n;
        }
        pos += take;
        f->mc_need -= (int64_t)take;
        if (f->mc_need)
            return n;
        *action = ask_unit(f->hold, f->holdlen, o);
        f->holdlen = 0;
        return give(f, pos, n);
    }
    for (;;) {
        if (f->mc_block) {
            size_t take = (int64_t)(n - pos) < f->mc_block ? n - pos : (size_t)f->mc_block;
            f->mc_block -= (int64_t)take;
            pos += take;
            if (f->mc_block)
                break;
        }
        if (pos >= n)
            break;
        const char *nl = memchr(p + pos, '\n', n - pos);
        if (nl == NULL) {
            if (rf_hold(f, p + pos, n - pos) < 0) {
                *action = RF_ERROR;
                return n;
            }
            f->mc_need = -1;
            o->fwd = pos;
            return n;
        }
        size_t end = (size_t)(nl - p) + 1;
        char c = p[pos];
        if (c != 'V' && c != 'C') {  /* neither V(ALUE/A) nor C(ONFIG): a plain line */
            pos = end;
            continue;
        }
        int ad;
        int64_t size = data_len(p + pos, end - pos, &ad);
        if (size == -2) {
            *action = RF_ERROR;
            return n;
        }
        if (size < 0) {
            pos = end;
            continue;
        }
        if (!ad) {
            pos = end;
            f->mc_block = size + 2;
            continue;
        }
        o->fwd = pos;
        if (size + 2 > RF_MAX_HOLD - (int64_t)(end - pos)) {
            *action = RF_ERROR;
            return n;
        }
        if ((int64_t)(n - end) < size + 2) {  /* the unit goes on in the next chunk */
            if (rf_hold(f, p + pos, n - pos) < 0) {
                *action = RF_ERROR;
                return n;
            }
            f->mc_need = size + 2 - (int64_t)(n - end);
            return n;
        }
        size_t stop = end + (size_t)size + 2;
        *action = ask_unit(p + pos, stop - pos, o);
        return give(f, stop, n);
    }
    o->fwd = n;
    return n;
}
