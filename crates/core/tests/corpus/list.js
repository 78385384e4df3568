onFarm({"servers":[{"name":"a","url":"ws://127.0.0.1:7400/stream","status":"UP","users":12,"priority":"A"}]});
