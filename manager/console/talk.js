// The console's Talk page: the browser speaks the device protocol to the gateway (protocol
// version 1: hello, listen, Opus frames), with the microphone through getUserMedia, Opus in
// and out through WebCodecs, and the reply played as it arrives. Like the firmware in auto
// mode it does not send audio while the reply plays (no echo cancellation to rely on).
"use strict";

class TalkSession {
  constructor(config, ui) {
    this.config = config;
    this.ui = ui;
    this.stats = { sent: 0, received: 0, decoded: 0 };
    this.speaking = false;
    this.pending = new Float32Array(0);
    this.timestamp = 0;
    this.playAt = 0;
  }

  async start() {
    if (!("AudioEncoder" in window) || !("AudioDecoder" in window)) throw new Error("this browser has no WebCodecs audio (try a current Chrome, Edge or Safari)");
    const frame = (this.config.sample_rate * this.config.frame_duration) / 1000;
    const encoderConfig = { codec: "opus", sampleRate: this.config.sample_rate, numberOfChannels: 1, bitrate: 24000, opus: { frameDuration: this.config.frame_duration * 1000 } };
    const supported = await AudioEncoder.isConfigSupported(encoderConfig);
    if (!supported.supported) throw new Error("this browser cannot encode Opus");
    this.frameSize = frame;

    // 1. The session, as a device: hello, then listening in auto mode.
    const url = new URL(this.config.ws_url);
    url.searchParams.set("device-id", this.config.device_id);
    url.searchParams.set("client-id", this.config.client_id);
    url.searchParams.set("protocol-version", String(this.config.protocol_version));
    if (this.config.token) url.searchParams.set("authorization", `Bearer ${this.config.token}`);
    this.ws = new WebSocket(url);
    this.ws.binaryType = "arraybuffer";
    const hello = new Promise((resolve, reject) => {
      this.helloResolve = resolve;
      this.ws.onerror = () => reject(new Error(`cannot reach the gateway at ${this.config.ws_url}`));
      setTimeout(() => reject(new Error("no hello from the server within 10 s")), 10000);
    });
    this.ws.onmessage = (event) => this.onMessage(event);
    this.ws.onclose = () => this.ui.status("Disconnected.");
    await new Promise((resolve, reject) => { this.ws.onopen = resolve; this.ws.addEventListener("error", reject, { once: true }); });
    this.send({ type: "hello", version: this.config.protocol_version, features: {}, transport: "websocket", audio_params: { format: "opus", sample_rate: this.config.sample_rate, channels: 1, frame_duration: this.config.frame_duration } });
    const serverHello = await hello;
    this.downRate = (serverHello.audio_params && serverHello.audio_params.sample_rate) || 24000;

    // 2. The reply's audio: Opus frames decoded and played back to back.
    this.playback = new AudioContext();
    this.decoder = new AudioDecoder({
      output: (data) => this.play(data),
      error: (exc) => this.ui.status(`decoder: ${exc.message}`),
    });
    this.decoder.configure({ codec: "opus", sampleRate: this.downRate, numberOfChannels: 1 });

    // 3. The microphone, in 60 ms Opus frames.
    this.encoder = new AudioEncoder({
      output: (chunk) => {
        if (this.speaking || this.ws.readyState !== WebSocket.OPEN) return;
        const bytes = new Uint8Array(chunk.byteLength);
        chunk.copyTo(bytes);
        this.ws.send(bytes);
        this.stats.sent += 1;
        this.ui.stats(this.stats);
      },
      error: (exc) => this.ui.status(`encoder: ${exc.message}`),
    });
    this.encoder.configure(encoderConfig);
    this.stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true } });
    this.capture = new AudioContext({ sampleRate: this.config.sample_rate });
    await this.capture.audioWorklet.addModule("/console/capture-worklet.js");
    const source = this.capture.createMediaStreamSource(this.stream);
    this.node = new AudioWorkletNode(this.capture, "xz-capture");
    this.node.port.onmessage = (event) => this.onSamples(event.data);
    source.connect(this.node);
    this.send({ type: "listen", state: "start", mode: "auto" });
    this.ui.status("Listening: say something.");
  }

  send(message) { this.ws.send(JSON.stringify(message)); }

  onSamples(samples) {
    // Samples the worklet sent before stop() may arrive after it closed the encoder.
    if (!this.encoder || this.encoder.state !== "configured") return;
    const joined = new Float32Array(this.pending.length + samples.length);
    joined.set(this.pending);
    joined.set(samples, this.pending.length);
    let offset = 0;
    while (joined.length - offset >= this.frameSize) {
      const block = joined.slice(offset, offset + this.frameSize);
      offset += this.frameSize;
      if (this.speaking) continue;  // like the firmware: no uplink while the reply plays
      const data = new AudioData({ format: "f32", sampleRate: this.config.sample_rate, numberOfFrames: this.frameSize, numberOfChannels: 1, timestamp: this.timestamp, data: block });
      this.timestamp += (this.frameSize / this.config.sample_rate) * 1e6;
      this.encoder.encode(data);
      data.close();
    }
    this.pending = joined.slice(offset);
  }

  onMessage(event) {
    if (typeof event.data !== "string") {
      if (!this.decoder || this.decoder.state !== "configured") return;
      this.stats.received += 1;
      this.decoder.decode(new EncodedAudioChunk({ type: "key", timestamp: this.stats.received * 60000, data: new Uint8Array(event.data) }));
      this.ui.stats(this.stats);
      return;
    }
    let message;
    try { message = JSON.parse(event.data); } catch { return; }
    if (message.type === "hello" && this.helloResolve) { this.helloResolve(message); this.helloResolve = null; }
    else if (message.type === "stt") this.ui.line("user", message.text);
    else if (message.type === "llm" && message.emotion) this.ui.emotion(message.emotion);
    else if (message.type === "tts" && message.state === "start") { this.speaking = true; this.ui.status("Speaking..."); }
    else if (message.type === "tts" && message.state === "sentence_start") this.ui.line("assistant", message.text);
    else if (message.type === "tts" && message.state === "stop") {
      // As the firmware does in auto mode: back to listening once the reply has played.
      const left = Math.max(0, this.playAt - this.playback.currentTime);
      setTimeout(() => {
        this.speaking = false;
        if (this.ws.readyState === WebSocket.OPEN) this.send({ type: "listen", state: "start", mode: "auto" });
        this.ui.status("Listening: say something.");
        this.ui.turnDone();
      }, left * 1000);
    }
  }

  play(data) {
    const samples = new Float32Array(data.numberOfFrames);
    data.copyTo(samples, { planeIndex: 0, format: "f32-planar" });
    const buffer = this.playback.createBuffer(1, samples.length, data.sampleRate);
    buffer.copyToChannel(samples, 0);
    data.close();
    const source = this.playback.createBufferSource();
    source.buffer = buffer;
    source.connect(this.playback.destination);
    this.playAt = Math.max(this.playAt, this.playback.currentTime + 0.05);
    source.start(this.playAt);
    this.playAt += buffer.duration;
    this.stats.decoded += 1;
    this.ui.stats(this.stats);
  }

  stop() {
    try { if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.close(1000); } catch { /* closed */ }
    if (this.node) this.node.port.onmessage = null;
    if (this.stream) for (const track of this.stream.getTracks()) track.stop();
    for (const thing of [this.capture, this.playback]) if (thing && thing.state !== "closed") thing.close();
    for (const codec of [this.encoder, this.decoder]) if (codec && codec.state !== "closed") codec.close();
  }
}

window.TalkSession = TalkSession;
