/* The framing part of the RESP framer (resp_internal.h): proxy/protocols/resp/framing.py's
 * Scanner, which says where a frame ends without reading it, and the reading of a whole
 * frame's elements, as far as matching needs them (frames.py parse). Python's int() for
 * every length, so that the two agree on any byte stream (tests/test_framer_fuzz.py). */
#include "resp_internal.h"

#include <stdlib.h>
#include <string.h>

int rf_grow(char **buf, uint32_t *cap, size_t need) {
    if (need <= *cap)
        return 0;
    size_t c = *cap ? *cap : 64;
    while (c < need)
        c *= 2;
    char *b = realloc(*buf, c);
    if (b == NULL)
        return -1;
    *buf = b;
    *cap = (uint32_t)c;
    return 0;
}

/* -- the scanner (framing.py Scanner) ------------------------------------------- */

static int push(rf_scan_t *s, int64_t v) {
    if (s->depth >= RF_MAX_DEPTH)
        return -1;
    if (s->depth == s->cap) {
        uint32_t c = s->cap ? s->cap * 2 : 8;
        int64_t *st = realloc(s->stack, c * sizeof(*st));
        if (st == NULL)
            return -1;
        s->stack = st;
        s->cap = c;
    }
    s->stack[s->depth++] = v;
    return 0;
}

/* Offset just past the first top-level frame completing in d[pos:n]; -1 when d ends
 * first (all consumed into the state); -2 for a broken stream. */
ssize_t rf_scan(rf_scan_t *s, const char *d, size_t n, size_t pos) {
    for (;;) {
        if (s->skip) {
            int64_t skip = s->skip;
            int64_t avail = (int64_t)(n - pos);
            if (skip > avail) {
                int64_t rest = skip - avail;
                if (rest == 1 && avail && d[n - 1] != '\r')
                    return -2;
                s->skip = rest;
                return -1;
            }
            size_t end = pos + (size_t)skip;
            if ((skip >= 2 && d[end - 2] != '\r') || d[end - 1] != '\n')
                return -2;
            s->skip = 0;
            pos = end;
            if (s->stream)
                continue;
        } else {
            if (pos >= n)
                return -1;
            const char *nlp = memchr(d + pos, '\n', n - pos);
            const char *h;
            size_t hl;
            if (s->linelen) {
                if (nlp == NULL) {
                    if (s->linelen + (n - pos) > RF_MAX_LINE)
                        return -2;
                    if (rf_grow(&s->line, &s->linecap, s->linelen + (n - pos)) < 0)
                        return -2;
                    memcpy(s->line + s->linelen, d + pos, n - pos);
                    s->linelen += (uint32_t)(n - pos);
                    return -1;
                }
                size_t take = (size_t)(nlp - d) + 1 - pos;
                if (rf_grow(&s->line, &s->linecap, s->linelen + take) < 0)
                    return -2;
                memcpy(s->line + s->linelen, d + pos, take);
                size_t full = s->linelen + take;
                s->linelen = 0;
                pos += take;
                if (full < 3 || s->line[full - 2] != '\r')
                    return -2;
                h = s->line;
                hl = full - 2;
            } else {
                if (nlp == NULL) {
                    if (n - pos > RF_MAX_LINE)
                        return -2;
                    if (rf_grow(&s->line, &s->linecap, n - pos) < 0)
                        return -2;
                    memcpy(s->line, d + pos, n - pos);
                    s->linelen = (uint32_t)(n - pos);
                    return -1;
                }
                size_t nl = (size_t)(nlp - d);
                if (nl - pos < 2 || d[nl - 1] != '\r')
                    return -2;
                h = d + pos;
                hl = nl - 1 - pos;
                pos = nl + 1;
            }
            int t = (unsigned char)h[0];
            int64_t v;
            if (s->stream && t != ';')
                return -2;
            if (t == '$' || t == '=' || t == '!') {
                if (t == '$' && hl == 2 && h[1] == '?') {
                    s->stream = 1;
                    continue;
                }
                if (pyint(h + 1, hl - 1, &v) < 0)
                    return -2;
                if (v < 0) {
                    if (v != -1 || t != '$')
                        return -2;
                } else {
                    if (v + 2 > (int64_t)(n - pos)) {
                        s->skip = v + 2;
                        continue;
                    }
                    size_t end = pos + (size_t)v + 2;
                    if (d[end - 2] != '\r' || d[end - 1] != '\n')
                        return -2;
                    pos = end;
                }
            } else if (t == '+' || t == '-' || t == ':' || t == '_' || t == ',' || t == '#' ||
                       t == '(') {
                /* one line */
            } else if (t == '*' || t == '%' || t == '~' || t == '>' || t == '|') {
                if (hl == 2 && h[1] == '?' && t != '|') {
                    if (push(s, 0) < 0)
                        return -2;
                    continue;
                }
                if (pyint(h + 1, hl - 1, &v) < 0)
                    return -2;
                if (v > 0) {
                    if (t == '%' || t == '|')
                        v *= 2;
                    if (push(s, t == '|' ? -v : v) < 0)
                        return -2;
                    continue;
                }
                if (v < 0 && (v != -1 || t != '*'))
                    return -2;
                if (t == '|')
                    continue;
            } else if (t == ';') {
                if (!s->stream)
                    return -2;
                if (pyint(h + 1, hl - 1, &v) < 0 || v < 0)
                    return -2;
                if (v) {
                    s->skip = v + 2;
                    continue;
                }
                s->stream = 0;
            } else if (t == '.') {
                if (!s->depth || s->stack[s->depth - 1] != 0)
                    return -2;
                s->depth--;
            } else {
                return -2;
            }
        }
        /* One element is complete: close every aggregate it completes. */
        int more = 0;
        while (s->depth) {
            int64_t c = s->stack[s->depth - 1];
            if (c > 1) {
                s->stack[s->depth - 1] = c - 1;
                more = 1;
                break;
            }
            if (c == 1) {
                s->depth--;
                continue;
            }
            if (c == 0) {
                more = 1;
                break;
            }
            if (c < -1) {
                s->stack[s->depth - 1] = c + 1;
                more = 1;
                break;
            }
            s->depth--;
            more = 1;
            break;
        }
        if (!more)
            return (ssize_t)pos;
    }
}

/* -- a whole frame, read for matching (frames.py parse, as far as matching needs) -- */

static uint64_t fnv(uint64_t h, const char *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)p[i];
        h *= 1099511628211ULL;
    }
    return h;
}
#define FNV0 14695981039346656037ULL

static void head_add(rf_elem_t *e, const char *p, size_t n) {
    for (size_t i = 0; i < n && e->vlen + i < RF_ARG; i++)
        e->head[e->vlen + i] = (char)lower((unsigned char)p[i]);
}

/* The end of the frame at d[pos:n] (an attribute runs on to the value it annotates),
 * read by a scanner of its own; -1 if it is not whole. */
static ssize_t skip_frame(const char *d, size_t n, size_t pos) {
    rf_scan_t s;
    memset(&s, 0, sizeof(s));
    ssize_t end = rf_scan(&s, d, n, pos);
    free(s.stack);
    free(s.line);
    return end < 0 ? -1 : end;
}

/* Past an attribute header at d[pos] (its 2v elements): the offset of what it annotates. */
static ssize_t skip_attribute(const char *d, size_t n, size_t pos, size_t nl) {
    int64_t v;
    if (pyint(d + pos + 1, nl - 1 - pos - 1, &v) < 0 || v < 0)
        return -1;
    size_t p = nl + 1;
    for (int64_t k = 0; k < 2 * v; k++) {
        ssize_t end = skip_frame(d, n, p);
        if (end < 0)
            return -1;
        p = (size_t)end;
    }
    return (ssize_t)p;
}

/* One element at d[pos:n] of a frame the scanner found whole (attributes before it are
 * not elements); -1 where parse() would fail. */
int rf_read_elem(const char *d, size_t n, size_t pos, rf_elem_t *e) {
    memset(e, 0, sizeof(*e));
    e->hash = FNV0;
    for (;;) {
        const char *nlp = pos < n ? memchr(d + pos, '\n', n - pos) : NULL;
        if (nlp == NULL || (size_t)(nlp - d) - pos < 2 || nlp[-1] != '\r')
            return -1;
        size_t nl = (size_t)(nlp - d);
        const char *h = d + pos;
        size_t hl = nl - 1 - pos;
        int t = (unsigned char)h[0];
        int64_t v;
        if (t == '|') {
            ssize_t p = skip_attribute(d, n, pos, nl);
            if (p < 0)
                return -1;
            pos = (size_t)p;
            continue;
        }
        e->kind = t;
        if (t == '*' || t == '%' || t == '~' || t == '>') {
            ssize_t end = skip_frame(d, n, pos);
            if (end < 0)
                return -1;
            e->end = (size_t)end;
            return 0;
        }
        if (t == '$' || t == '=' || t == '!') {
            if (t == '$' && hl == 2 && h[1] == '?') {
                size_t p = nl + 1;
                e->isbytes = 1;
                for (;;) {
                    const char *q = p < n ? memchr(d + p, '\n', n - p) : NULL;
                    if (q == NULL || (size_t)(q - d) - p < 2 || q[-1] != '\r' || d[p] != ';')
                        return -1;
                    size_t ql = (size_t)(q - d);
                    if (pyint(d + p + 1, ql - 1 - p - 1, &v) < 0)
                        return -1;
                    p = ql + 1;
                    if (v == 0)
                        break;
                    if (v < 0 || v + 2 > (int64_t)(n - p) || d[p + v] != '\r' ||
                            d[p + v + 1] != '\n')
                        return -1;
                    head_add(e, d + p, (size_t)v);
                    e->hash = fnv(e->hash, d + p, (size_t)v);
                    e->vlen += (size_t)v;
                    p += (size_t)v + 2;
                }
                e->end = p;
                return 0;
            }
            if (pyint(h + 1, hl - 1, &v) < 0)
                return -1;
            if (v == -1 && t == '$') {
                e->end = nl + 1;
                return 0;
            }
            if (v < 0 || v + 2 > (int64_t)(n - nl - 1) || d[nl + 1 + v] != '\r' ||
                    d[nl + 2 + v] != '\n')
                return -1;
            e->isbytes = 1;
            e->v = d + nl + 1;
            head_add(e, e->v, (size_t)v);  /* at vlen, still 0 */
            e->vlen = (size_t)v;
            e->hash = fnv(FNV0, e->v, e->vlen);
            e->end = nl + 3 + (size_t)v;
            return 0;
        }
        if (t == '+' || t == '-' || t == ':' || t == ',' || t == '#' || t == '(') {
            e->isbytes = 1;
            e->v = h + 1;
            head_add(e, e->v, hl - 1);
            e->vlen = hl - 1;
            e->hash = fnv(FNV0, e->v, e->vlen);
            e->end = nl + 1;
            return 0;
        }
        if (t == '_') {
            e->end = nl + 1;
            return 0;
        }
        return -1;
    }
}

/* The header of the aggregate a whole frame is (after any attribute). */
int rf_read_agg(const char *raw, size_t n, rf_agg_t *a) {
    size_t pos = 0;
    for (;;) {
        const char *nlp = pos < n ? memchr(raw + pos, '\n', n - pos) : NULL;
        if (nlp == NULL || (size_t)(nlp - raw) - pos < 2 || nlp[-1] != '\r')
            return -1;
        size_t nl = (size_t)(nlp - raw);
        int t = (unsigned char)raw[pos];
        int64_t v;
        if (t == '|') {
            ssize_t p = skip_attribute(raw, n, pos, nl);
            if (p < 0)
                return -1;
            pos = (size_t)p;
            continue;
        }
        a->kind = t;
        a->first = nl + 1;
        a->streamed = 0;
        a->count = 0;
        if (t != '*' && t != '%' && t != '~' && t != '>')
            return 0;
        if (nl - pos == 3 && raw[pos + 1] == '?') {
            a->streamed = 1;
            return 0;
        }
        if (pyint(raw + pos + 1, nl - 1 - pos - 1, &v) < 0)
            return -1;
        a->count = v < 0 ? -1 : (t == '%' ? 2 * v : v);
        return 0;
    }
}

/* Element i of an aggregate; -1 if absent or unreadable. */
int rf_nth(const char *raw, size_t n, const rf_agg_t *a, int64_t i, rf_elem_t *out) {
    size_t p = a->first;
    for (int64_t k = 0;; k++) {
        if (!a->streamed && k >= a->count)
            return -1;
        if (a->streamed && p < n && raw[p] == '.')
            return -1;
        if (rf_read_elem(raw, n, p, out) < 0)
            return -1;
        if (k == i)
            return 0;
        p = out->end;
    }
}
