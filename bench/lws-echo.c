/* The libwebsockets peer of straycat's benchmarks: a WebSocket echo server on any path of
 * 127.0.0.1:PORT, one thread, libwebsockets' default settings. Each message is copied once
 * (lws hands a received message to us in pieces, and lws_write() needs LWS_PRE bytes of
 * headroom before the payload), queued per connection and written back when the socket is
 * writable, as many per writable callback as the kernel takes.
 *
 *   gcc -O2 -o lws-echo lws-echo.c $(pkg-config --cflags --libs libwebsockets)
 *   ./lws-echo 19003
 */
#include <libwebsockets.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

/* Messages queued on one connection past which we stop reading it (flow control). */
#define MAX_QUEUED 64

struct msg {
	struct msg *next;
	size_t len;
	int binary;
	unsigned char buf[]; /* LWS_PRE bytes of headroom, then the payload */
};

/* Per-connection state (lws allocates and zeroes it). */
struct pss {
	struct msg *head, *tail; /* replies waiting to be written, oldest first */
	int queued;              /* how many */
	int rx_paused;           /* reading stopped because `queued` reached MAX_QUEUED */
	struct msg *partial;     /* the message being received, when it came in pieces */
};

static volatile int stop;

static void on_signal(int sig) { (void)sig; stop = 1; }

static struct msg *grow(struct msg *m, const void *in, size_t len, int binary)
{
	size_t old = m ? m->len : 0;
	struct msg *n = realloc(m, sizeof(*n) + LWS_PRE + old + len);
	if (!n) {
		free(m);
		return NULL;
	}
	if (!m)
		n->next = NULL;
	memcpy(n->buf + LWS_PRE + old, in, len);
	n->len = old + len;
	n->binary = binary;
	return n;
}

static int callback_echo(struct lws *wsi, enum lws_callback_reasons reason, void *user,
			 void *in, size_t len)
{
	struct pss *p = user;

	switch (reason) {
	case LWS_CALLBACK_RECEIVE: {
		p->partial = grow(p->partial, in, len, lws_frame_is_binary(wsi));
		if (!p->partial)
			return -1;
		if (!lws_is_final_fragment(wsi) || lws_remaining_packet_payload(wsi))
			return 0;
		struct msg *m = p->partial;
		p->partial = NULL;
		if (p->tail)
			p->tail->next = m;
		else
			p->head = m;
		p->tail = m;
		if (++p->queued >= MAX_QUEUED && !p->rx_paused) {
			lws_rx_flow_control(wsi, 0);
			p->rx_paused = 1;
		}
		lws_callback_on_writable(wsi);
		return 0;
	}
	case LWS_CALLBACK_SERVER_WRITEABLE:
		while (p->head) {
			struct msg *m = p->head;
			int n = lws_write(wsi, m->buf + LWS_PRE, m->len,
					  m->binary ? LWS_WRITE_BINARY : LWS_WRITE_TEXT);
			if (n < (int)m->len)
				return -1;
			p->head = m->next;
			if (!p->head)
				p->tail = NULL;
			p->queued--;
			free(m);
			if (lws_send_pipe_choked(wsi))
				break;
		}
		if (p->rx_paused && p->queued < MAX_QUEUED / 2) {
			lws_rx_flow_control(wsi, 1);
			p->rx_paused = 0;
		}
		if (p->head)
			lws_callback_on_writable(wsi);
		return 0;
	case LWS_CALLBACK_CLOSED:
		while (p->head) {
			struct msg *m = p->head;
			p->head = m->next;
			free(m);
		}
		free(p->partial);
		p->partial = NULL;
		return 0;
	default:
		/* Plain HTTP and the rest: libwebsockets' defaults. */
		return lws_callback_http_dummy(wsi, reason, user, in, len);
	}
}

static const struct lws_protocols protocols[] = {
	{ "echo", callback_echo, sizeof(struct pss), 0, 0, NULL, 0 },
	{ NULL, NULL, 0, 0, 0, NULL, 0 } /* terminator */
};

int main(int argc, char **argv)
{
	struct lws_context_creation_info info;
	struct lws_context *ctx;

	if (argc != 2 || atoi(argv[1]) <= 0) {
		fprintf(stderr, "usage: lws-echo PORT   (listens on 127.0.0.1 only)\n");
		return 2;
	}
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	lws_set_log_level(LLL_ERR | LLL_WARN, NULL);

	memset(&info, 0, sizeof(info));
	info.port = atoi(argv[1]);
	info.iface = "127.0.0.1";
	info.protocols = protocols;
	ctx = lws_create_context(&info);
	if (!ctx) {
		fprintf(stderr, "lws-echo: cannot create the context (port in use?)\n");
		return 1;
	}
	while (!stop && lws_service(ctx, 0) >= 0)
		;
	lws_context_destroy(ctx);
	return 0;
}
