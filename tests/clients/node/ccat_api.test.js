// straycat against the official Cheshire Cat TypeScript client, ccat-api (npm), the version
// pinned in package.json, under Node.js 20 (its WebSocket is `ws`, through isomorphic-ws).
//
// What the client does (read from its dist/index.js): `new CatClient({host, port, userId,
// credential, secure, ws: {delay, retries, onFailed}})` opens at once
// `ws://HOST:PORT/ws/{userId}` (`wss` with `secure`), adding `?token={credential}` when one
// is set (neither is URL-encoded). `send({text, ...})` sends `{...msg, user_id}`. A message
// with `text`/`audio`/`image`, `user_id`, `who` and `type` other than `error` goes to
// onMessage, so does one with `content` and `type` (a `chat_token`, a `notification`); every
// other frame (the `error` frames) goes to onError. A close it did not ask for makes it
// reconnect after `delay` ms (3000), up to `retries` (3) closes in a row, then onFailed
// (`FailedRetry`); an open resets the count. Its HTTP client (axios) sends `user_id: {userId}`
// and, with a credential, `access_token` and `Authorization: Bearer`, and calls, for the chat:
// `GET /` (status), `POST /message`, `GET` and `DELETE /memory/conversation_history`.
//
// The HTTP tests skip while straycat answers 404/405 on `/memory/conversation_history`.
'use strict';

const assert = require('node:assert/strict');
const { after, afterEach, before, describe, test } = require('node:test');
const { CatClient, isMessageResponse, isTokenResponse } = require('ccat-api');
const { Client, Server, hasChatApi, within } = require('./harness');

const KEY = 'kiosk-secret-42';
// The echo agent streams word by word: at 300 ms a word, this reply takes 2.1 s.
const SLOW_TEXT = 'the kiosk closes while the cat answers';
const T = { timeout: 60000 };

let made = [];
function client(port, userId, opts) {
  const c = new Client(port, userId, opts);
  made.push(c);
  return c;
}
afterEach(() => {
  for (const c of made) c.close();
  made = [];
});

// A `chat` frame as Cheshire Cat 1.x sends it (the echo agent answers the text).
function checkChat(frame, userId, text) {
  assert.ok(isMessageResponse(frame), JSON.stringify(frame));
  assert.equal(frame.type, 'chat');
  assert.equal(frame.who, 'AI');
  assert.equal(frame.user_id, userId);
  assert.equal(frame.text, text);
  assert.equal(frame.content, text);
  assert.equal(frame.why.input, text);
  assert.ok(Array.isArray(frame.why.intermediate_steps));
  assert.equal(typeof frame.why.memory, 'object');
  assert.equal(typeof frame.when, 'number');
  assert.equal(typeof frame.seq, 'number');
}

// --- (a) chat -------------------------------------------------------------------------

describe('chat', () => {
  const server = new Server();
  before(() => server.start());
  after(() => server.stop());

  test('tokens then the reply, through onMessage', T, async () => {
    const c = client(server.port, 'js-alice');
    await c.waitOpen();
    c.cat.send({ text: 'hello from ccat-api' });
    const reply = await c.waitChat();
    checkChat(reply, 'js-alice', 'hello from ccat-api');
    const tokens = c.frames.filter((f) => f.type === 'chat_token');
    assert.ok(tokens.length > 0 && c.frames.at(-1) === reply, c.describe());
    assert.ok(tokens.every((t) => isTokenResponse(t) && !('seq' in t)));
    assert.equal(tokens.map((t) => t.content).join(''), reply.text);
    assert.deepEqual(c.errors, []);
  });

  test('several users at once', T, async () => {
    const users = [0, 1, 2, 3].map((i) => client(server.port, `js-user-${i}`));
    await Promise.all(users.map((c) => c.waitOpen()));
    for (const c of users) c.cat.send({ text: `I am ${c.userId}` });
    for (const c of users) checkChat(await c.waitChat(), c.userId, `I am ${c.userId}`);
  });

  test('extra fields pass; the id extension comes back as reply_to', T, async () => {
    const c = client(server.port, 'js-ids');
    await c.waitOpen();
    c.cat.send({ text: 'once only', id: 'js-1', lang: 'en' });
    const reply = await c.waitChat();
    checkChat(reply, 'js-ids', 'once only');
    assert.equal(reply.reply_to, 'js-1');
  });

  test('a dropped connection: the client reconnects by itself and gets the reply', T, async () => {
    // ws.terminate() drops the TCP connection without a close handshake (a kiosk losing its
    // network); ccat-api did not ask for that close, so it reconnects after `delay`.
    const c = client(server.port, 'js-dropped', { delay: 200 });
    await c.waitOpen();
    c.cat.ws.terminate();
    await c.waitOpen(2);
    c.cat.send({ text: 'back again' });
    checkChat(await c.waitChat(), 'js-dropped', 'back again');
  });

  test(
    'a second client of the same user replaces the first, which stays away',
    { ...T, todo: 'ccat-api reconnects a socket straycat closed with 1000 replaced; see the README, Official Cheshire Cat clients' },
    async () => {
      // straycat closes the older socket (1000 `replaced`); the Cat keeps it open (its
      // websocket manager only swaps the user's entry). ccat-api reconnects any socket it
      // did not close itself, so the first client comes back after `delay` and replaces
      // the second, which comes back and replaces the first... Two tabs of one user
      // take turns for ever. Five reconnection delays without a comeback count as settled.
      const delay = 200;
      const a = client(server.port, 'js-twice', { delay });
      await a.waitOpen();
      const b = client(server.port, 'js-twice', { delay });
      await b.waitOpen();
      await a.waitClosed();
      const cameBack = await a.wait(() => a.opens >= 2, 'comeback', 5 * delay).then(
        () => true,
        () => false,
      );
      assert.equal(cameBack, false, `the replaced client reconnected: ${a.describe()}; ${b.describe()}`);
    },
  );

  test(
    "status.home() gets the Cat's status JSON",
    T,
    async () => {
      const cat = new CatClient({ host: '127.0.0.1', port: server.port, userId: 'js-home', instant: false });
      cat.init();
      try {
        const status = await within(cat.api.status.home(), 'GET /');
        assert.equal(typeof status, 'object', `GET / answered ${String(status).slice(0, 60)}…`);
        assert.ok('status' in status && 'version' in status, JSON.stringify(status));
      } finally {
        cat.close();
      }
    },
  );
});

// --- (b) closing mid-answer; error frames -----------------------------------------------

describe('slow answers (--echo-delay-ms 300, no queue)', () => {
  const server = new Server(['--echo-delay-ms', '300', '--max-queued-turns', '0']);
  before(() => server.start());
  after(() => server.stop());

  test('closed mid-answer: a new client of the same user gets the held reply', T, async () => {
    const user = 'js-held';
    const a = client(server.port, user);
    await a.waitOpen();
    const mark = server.mark();
    a.cat.send({ text: SLOW_TEXT });
    await a.waitFrame((f) => f.type === 'chat_token', 'first token');
    a.close();
    await a.waitClosed();
    assert.ok(!a.frames.some((f) => f.type === 'chat'), 'the reply came before the close');
    // The server says when the reply is done with nobody connected: wait for that, so the
    // next client tests delivery of held frames on connect, not a live stream.
    await server.waitLog((l) => l.includes(`user=${user} reply ready while away`), { since: mark });
    const b = client(server.port, user);
    const reply = await b.waitChat();
    checkChat(reply, user, SLOW_TEXT);
    assert.equal(b.frames[0], reply, `expected the held reply first: ${b.describe()}`);
  });

  test('dropped mid-answer: the same client reconnects and gets the reply', T, async () => {
    const c = client(server.port, 'js-held-drop', { delay: 500 });
    await c.waitOpen();
    c.cat.send({ text: SLOW_TEXT });
    await c.waitFrame((f) => f.type === 'chat_token', 'first token');
    c.cat.ws.terminate();
    await c.waitOpen(2);
    checkChat(await c.waitChat(), 'js-held-drop', SLOW_TEXT);
  });

  test('an error frame reaches onError (Busy: no queue)', T, async () => {
    const c = client(server.port, 'js-busy');
    await c.waitOpen();
    c.cat.send({ text: 'one two' });
    c.cat.send({ text: 'three' });
    const err = await c.wait(() => c.errors.find((e) => e.type === 'error'), 'error frame');
    assert.equal(err.name, 'Busy');
    assert.ok(err.description);
    checkChat(await c.waitChat(), 'js-busy', 'one two');
  });
});

// --- a server restart -------------------------------------------------------------------

describe('server restart', () => {
  const server = new Server();
  before(() => server.start());
  after(() => server.stop());

  test('the client reconnects by itself once the server is back', T, async () => {
    const c = client(server.port, 'js-restart', { delay: 300, retries: 50 });
    await c.waitOpen();
    await server.stop(); // every socket closed with 1001
    await c.waitClosed();
    await server.start(); // the same port
    await c.waitOpen(2);
    c.cat.send({ text: 'after the restart' });
    checkChat(await c.waitChat(), 'js-restart', 'after the restart');
  });
});

// --- (c) --api-key ----------------------------------------------------------------------

describe('--api-key', () => {
  const server = new Server(['--api-key', KEY]);
  before(() => server.start());
  after(() => server.stop());

  test("the client's credential is accepted", T, async () => {
    const c = client(server.port, 'js-keyed', { credential: KEY });
    await c.waitOpen();
    c.cat.send({ text: 'with the key' });
    checkChat(await c.waitChat(), 'js-keyed', 'with the key');
  });

  for (const credential of ['not-the-key', undefined]) {
    test(`a ${credential ? 'wrong' : 'missing'} credential is refused (403), then FailedRetry`, T, async () => {
      const mark = server.mark();
      const c = client(server.port, 'js-intruder', { credential, delay: 50, retries: 2 });
      const failed = await c.wait(() => c.failed, 'FailedRetry');
      assert.equal(failed.name, 'FailedRetry');
      assert.equal(c.opens, 0);
      assert.equal(c.closes, 2);
      assert.ok(c.errors.length >= 1 && c.errors.every((e) => e.name === 'SocketError'), c.describe());
      const refused = server.lines.slice(mark).filter((l) => l.includes('/ws/js-intruder') && l.includes('refused with 403'));
      assert.equal(refused.length, 2, server.log());
    });
  }
});

// --- (d) the HTTP API (skipped until straycat serves it) --------------------------------

// Shapes the clients expect that straycat does not give (yet): noted, then the test ends as
// TODO once its hard checks passed (and passes when they are gone).
function gapsOf(t) {
  const found = [];
  return {
    note(ok, what) {
      if (!ok && !found.includes(what)) found.push(what);
    },
    settle() {
      if (found.length) t.todo(`straycat's HTTP API: ${found.join('; ')}`);
    },
  };
}

function checkHistory(entries, said, answered, gaps) {
  assert.deepEqual(entries.map((e) => e.who), ['Human', 'AI'], JSON.stringify(entries));
  assert.equal(entries[0].message, said);
  assert.equal(entries[1].message, answered);
  for (const e of entries) {
    assert.equal(e.role, e.who);
    assert.equal(e.content, e.message);
    assert.equal(typeof (e.why ?? {}), 'object');
    gaps.note(typeof e.when === 'number', "history entries have no `when` (ccat-api's ConversationMessage type requires it)");
  }
}

for (const keyed of [false, true]) {
  describe(`HTTP API${keyed ? ' with --api-key' : ''}`, () => {
    const server = new Server(keyed ? ['--api-key', KEY] : []);
    const credential = keyed ? KEY : undefined;
    let served = false;
    before(async () => {
      await server.start();
      served = await hasChatApi(server.port, keyed ? { access_token: KEY } : {});
    });
    after(() => server.stop());
    const skip = (t) => {
      if (!served) t.skip('straycat has no GET /memory/conversation_history yet (404/405)');
      return !served;
    };

    test('history of a socket chat, wiped', T, async (t) => {
      if (skip(t)) return;
      const gaps = gapsOf(t);
      const c = client(server.port, 'js-history', { credential });
      await c.waitOpen();
      c.cat.send({ text: 'remember me' });
      await c.waitChat();
      const memory = c.cat.api.memory;
      const got = await within(memory.getConversationHistory(), 'GET /memory/conversation_history');
      checkHistory(got.history, 'remember me', 'remember me', gaps);
      assert.deepEqual(await within(memory.wipeConversationHistory(), 'DELETE'), { deleted: true });
      assert.deepEqual(await within(memory.getConversationHistory(), 'GET'), { history: [] });
      gaps.settle();
    });

    test('POST /message: messageWithCat answers the chat, in the same session', T, async (t) => {
      if (skip(t)) return;
      const gaps = gapsOf(t);
      const c = client(server.port, 'js-message', { credential });
      await c.waitOpen();
      const answer = await within(c.cat.api.status.messageWithCat({ text: 'over http' }), 'POST /message');
      // CatMessage: content, user_id, type, why; straycat's is the socket's chat frame.
      checkChat(answer, 'js-message', 'over http');
      const got = await within(c.cat.api.memory.getConversationHistory(), 'GET');
      checkHistory(got.history, 'over http', 'over http', gaps);
      // The session is the socket's too: its client sees the turn.
      checkChat(await c.waitChat(), 'js-message', 'over http');
      gaps.settle();
    });

    test('POST /message of a user with no socket, then a client of that user', T, async (t) => {
      if (skip(t)) return;
      const cat = new CatClient({ host: '127.0.0.1', port: server.port, userId: 'js-http-only', credential, instant: false });
      cat.init();
      cat.close(); // the HTTP client only
      const answer = await within(cat.api.status.messageWithCat({ text: 'no socket here' }), 'POST /message');
      checkChat(answer, 'js-http-only', 'no socket here');
      // The reply is held for the user's socket too: a client that connects now gets it.
      const c = client(server.port, 'js-http-only', { credential });
      const held = await c.waitChat();
      checkChat(held, 'js-http-only', 'no socket here');
      assert.equal(held.seq, answer.seq);
      assert.equal(c.frames[0], held, c.describe());
    });

    if (keyed) {
      test('a wrong credential gets 403 from every endpoint', T, async (t) => {
        if (skip(t)) return;
        const cat = new CatClient({ host: '127.0.0.1', port: server.port, userId: 'js-intruder', credential: 'nope', instant: false });
        cat.init();
        cat.close();
        for (const [what, call] of [
          ['GET history', () => cat.api.memory.getConversationHistory()],
          ['DELETE history', () => cat.api.memory.wipeConversationHistory()],
          ['POST /message', () => cat.api.status.messageWithCat({ text: 'let me in' })],
        ]) {
          await assert.rejects(within(call(), what), (e) => e.status === 403, what);
        }
      });
    }
  });
}
