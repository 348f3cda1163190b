// Microphone samples to the page in blocks (the AudioWorklet thread cannot use WebCodecs).
class Capture extends AudioWorkletProcessor {
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel && channel.length) this.port.postMessage(channel.slice(0));
    return true;
  }
}
registerProcessor("xz-capture", Capture);
