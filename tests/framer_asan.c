/* The RESP framer alone, for an AddressSanitizer build (tests/test_framer_fuzz.py).
 * Each file: records of 'Q'|'R', a 4-byte little-endian length, the bytes. Prints per
 * file the bytes the framer forwards (asks passed through unchanged, "!" at an error)
 * in hex, one line per file. A first argument --mc frames Memcached (mc_framer.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "resp_framer.h"

static void hex(const char *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        printf("%02x", (unsigned char)p[i]);
}

int main(int argc, char **argv) {
    int mc = argc > 1 && strcmp(argv[1], "--mc") == 0;
    for (int a = 1 + mc; a < argc; a++) {
        FILE *fp = fopen(argv[a], "rb");
        if (fp == NULL)
            return 2;
        rf_t f;
        rf_init(&f, NULL, NULL);
        rf_protocol(&f, mc);
        int failed = 0;
        for (;;) {
            int kind = fgetc(fp);
            unsigned char len[4];
            if (kind == EOF || fread(len, 1, 4, fp) != 4)
                break;
            size_t n = len[0] | len[1] << 8 | len[2] << 16 | (size_t)len[3] << 24;
            char *buf = malloc(n ? n : 1);
            if (buf == NULL || fread(buf, 1, n, fp) != n)
                return 3;
            if (kind == 'Q') {
                rf_request(&f, buf, n);
            } else if (!failed) {
                size_t off = 0;
                do {
                    rf_out_t o;
                    int act;
                    size_t used = rf_reply(&f, buf + off, n - off, &o, &act);
                    hex(buf + off, o.fwd);
                    if (act == RF_ERROR) {
                        printf("21");
                        failed = 1;
                        break;
                    }
                    if (act == RF_EMIT || act == RF_ASK)
                        hex(o.data, o.len);
                    off += used;
                } while (off < n);
                rf_release(&f);
            }
            free(buf);
        }
        rf_free(&f);
        fclose(fp);
        printf("\n");
    }
    return 0;
}
